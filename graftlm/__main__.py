import os
import sys

from graftlm.cli import main

if __name__ == "__main__":
    status = main()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # A rank of a torchrun job (`torchrun ... -m graftlm`) that has finished, its
        # process group destroyed and its files closed, leaves without the interpreter's
        # teardown: there, C++ threads of the collective backend (gloo) still joinable can
        # abort the finished rank with SIGABRT ("terminate called without an active
        # exception", pytorch#179291), and torchrun then fails the whole job.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    raise SystemExit(status)
