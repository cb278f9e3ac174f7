"""One invoke of the worker function in a process of its own, as Lambda runs it: the event as
JSON on stdin, the result as JSON on stdout, the process environment the function's (the
template's variables and the worker role's credentials). A raised error exits 1 with the
traceback on stderr.

`python -m tests.deploy.run_worker` (used by tests/deploy/test_template_policies.py)."""

from __future__ import annotations

import json
import sys
import traceback


class Context:
    function_name = "tickweave-worker"
    aws_request_id = "req-worker"

    def get_remaining_time_in_millis(self) -> int:
        return 60_000


def main() -> int:
    event = json.load(sys.stdin)
    try:
        import handler.worker

        result = handler.worker.lambda_handler(event, Context())
    except Exception:
        traceback.print_exc()
        return 1
    json.dump(result, sys.stdout, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
