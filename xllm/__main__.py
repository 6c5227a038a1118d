import sys

from xllm.cli.main import main

sys.exit(main())
