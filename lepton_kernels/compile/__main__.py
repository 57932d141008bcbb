import sys

from lepton_kernels.compile.cli import main

sys.exit(main())
