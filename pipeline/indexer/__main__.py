import sys

from pipeline.indexer.main import main

sys.exit(main())
