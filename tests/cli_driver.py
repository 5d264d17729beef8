"""Run console-script cases, each in its own forked process, and print their results as JSON.

One interpreter pays the imports once; every case is a real process with its own exit status,
stdout and stderr (the parent never touches torch, so forking is safe). Used by test_faults.py.
stdin: [{"script": "loftup-store", "args": [...]}, ...]; stdout: [{"rc", "out", "err"}, ...].
"""

import json
import os
import sys
import tempfile
import time
import traceback


def _child(script, app, args, out_fd, err_fd) -> int:
    from loftup.cli.common import run

    sys.argv = [script, *args]  # the program name in usage lines
    os.dup2(out_fd, 1)
    os.dup2(err_fd, 2)
    sys.stdout = open(1, "w", closefd=False)
    sys.stderr = open(2, "w", closefd=False)
    try:
        run(app, args)
        return 0
    except SystemExit as exc:
        code = exc.code
        if code is None:
            return 0
        if not isinstance(code, int):
            print(code, file=sys.stderr)
            return 1
        return code
    except BaseException:
        traceback.print_exc()  # what Python would do: the test looks for this
        return 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()


def main() -> None:
    import loftup.pictures  # noqa: F401

    # Imports only (no tensor work, so no thread pools exist when we fork): children start warm.
    import loftup.pipeline.backbones  # noqa: F401
    import loftup.pipeline.jobs  # noqa: F401
    import loftup.training.evaluation  # noqa: F401
    import loftup.training.inference  # noqa: F401
    import loftup.training.stage1  # noqa: F401
    import loftup.training.stage2  # noqa: F401
    from loftup.cli import infer, pipeline, store, train

    apps = {"loftup": infer.app, "loftup-pipeline": pipeline.app, "loftup-store": store.app, "loftup-train": train.app}
    cases = json.load(sys.stdin)
    results = []
    for case in cases:
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
            t0 = time.monotonic()
            pid = os.fork()
            if pid == 0:
                code = 1
                try:
                    code = _child(case["script"], apps[case["script"]], case["args"], out.fileno(), err.fileno())
                finally:
                    os._exit(code)
            _, status = os.waitpid(pid, 0)
            out.seek(0)
            err.seek(0)
            results.append(
                {
                    "rc": os.waitstatus_to_exitcode(status),
                    "out": out.read().decode(errors="replace"),
                    "err": err.read().decode(errors="replace"),
                    "seconds": round(time.monotonic() - t0, 2),
                }
            )
    json.dump(results, sys.stdout)


if __name__ == "__main__":
    main()
