import sys

from neurond.daemon import main

sys.exit(main())
