import sys

from fastclip.train.main import main

sys.exit(main())
