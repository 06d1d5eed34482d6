import sys

from pipeline.embedder.main import main

sys.exit(main())
