import sys

from pipeline.matcher.main import main

sys.exit(main())
