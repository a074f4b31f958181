from neurond.daemon import main
import sys

sys.exit(main())
