"""`python -m hpcray app.py [args]` / `python -m hpcray -m module [args]`.

Runs the program as its driver, as `python app.py` would. Under a launcher every rank
runs this; the ranks > 0 become node managers (the multi-node mode). An uncaught
exception in the driver ends the program with a non-zero exit status after the
runtime has shut down, so no worker or segment outlives it.
"""

from __future__ import annotations

import runpy
import sys

USAGE = "usage: python -m hpcray app.py [args...] | python -m hpcray -m module [args...]"


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE, file=sys.stderr if not argv else sys.stdout)
        return 2 if not argv else 0
    if argv[0] == "-m":
        if len(argv) < 2:
            print(USAGE, file=sys.stderr)
            return 2
        sys.argv = argv[1:]
        run = lambda: runpy.run_module(argv[1], run_name="__main__", alter_sys=True)  # noqa: E731
    else:
        sys.argv = argv
        import os
        sys.path.insert(0, os.path.dirname(os.path.abspath(argv[0])))
        run = lambda: runpy.run_path(argv[0], run_name="__main__")  # noqa: E731
    from hpcray.runtime import launch
    try:
        transport = launch.world()
    except launch.LaunchError as exc:
        print(f"hpcray: {exc}", file=sys.stderr)
        return 1
    if transport is not None and transport.rank != 0:
        # Only rank 0 runs the program; the other ranks are its nodes until it ends.
        return launch.serve_ranks(transport, lambda job: launch.build_node(
            job, transport, run_thread=False))
    if transport is not None:
        launch.end_on_sigterm()
    code = 0
    try:
        run()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:
        import traceback
        traceback.print_exc()
        code = 1
    finally:
        from hpcray import api
        api.shutdown()
        launch.end_ranks(code)
    launch.leave_if_terminating(code)
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
