"""Runs the trusted test of one problem and decides its verdict; the candidate runs in another process.

Started by `sandbox.py` as `python -I -S _sandbox_harness.py <settings-json>` with an empty environment and
`{"prompt", "test", "entry_point"}` as JSON on stdin. It executes the problem's prompt (its helpers and
imports, with the entry point's docstring-only body) and test here, with `entry_point` bound to a proxy:
each `candidate(...)` call crosses the pipe to the sandboxed `_sandbox_child.py serve` as plain built-in
values and the result comes back rebuilt from scratch (`_sandbox_wire`). The model's code never shares
this interpreter, so it cannot fake `==`, walk these frames, read this test, or write the verdict, which
goes to a pipe only this process holds: b"passed", b"failed" or b"error" (does not compile).
"""

import json
import os
import sys
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _sandbox_kernel  # noqa: E402 - sibling modules, by path: piece_cl is not importable here
import _sandbox_wire  # noqa: E402

del sys.path[0]


class CandidateFailed(AssertionError):
    """The candidate raised, returned something that is not a plain value, or stopped answering."""


def make_proxy(call_fd: int, reply_fd: int):
    send, receive, encode, decode = (_sandbox_wire.send, _sandbox_wire.receive, _sandbox_wire.encode,
                                     _sandbox_wire.decode)

    def candidate(*args, **kwargs):
        if kwargs:
            raise CandidateFailed("keyword arguments are not sent to the candidate")
        send(call_fd, {"args": [encode(arg) for arg in args]})
        try:
            reply = receive(reply_fd)
        except (EOFError, OSError, _sandbox_wire.NotPlain) as error:
            raise CandidateFailed(f"no valid reply from the candidate: {error}") from None
        if type(reply) is dict and len(reply) == 1 and "value" in reply:
            try:
                return decode(reply["value"])
            except _sandbox_wire.NotPlain as error:
                raise CandidateFailed(f"the candidate's result: {error}") from None
        if type(reply) is dict and len(reply) == 1 and type(reply.get("raised")) is str:
            raise CandidateFailed(f"the candidate raised {reply['raised']}")
        raise CandidateFailed("malformed reply from the candidate")

    return candidate


def decide(problem: dict, call_fd: int, reply_fd: int) -> bytes:
    try:
        first = _sandbox_wire.receive(reply_fd)
    except (EOFError, OSError, _sandbox_wire.NotPlain) as error:
        print(f"sandbox: the candidate did not start: {error}", file=sys.stderr)
        return b"failed"
    if first == {"compile_error": True}:
        return b"error"
    if first != {"ready": True}:
        print(f"sandbox: the candidate did not load: {str(first)[:500]}", file=sys.stderr)
        return b"failed"
    proxy = make_proxy(call_fd, reply_fd)
    namespace = {"__name__": "__harness__"}
    try:
        exec(compile(problem["prompt"], "prompt.py", "exec"), namespace)
        namespace[problem["entry_point"]] = proxy
        exec(compile(problem["test"], "test.py", "exec"), namespace)
        namespace["check"](proxy)
    except Exception as error:  # noqa: BLE001 - any failure of the test is the candidate's failure
        traceback.print_exception(error, limit=-3, file=sys.stderr)
        return b"failed"
    return b"passed"


def main() -> None:
    settings = json.loads(sys.argv[1])
    _sandbox_kernel.die_with_parent()
    if os.getppid() != settings["parent_pid"]:
        os._exit(1)  # the runner died before the kernel could be told
    problem = json.loads(sys.stdin.buffer.read())
    verdict = decide(problem, settings["call_fd"], settings["reply_fd"])
    os.close(settings["call_fd"])  # the candidate's end of file: it exits
    sys.stderr.flush()
    os.write(settings["verdict_fd"], verdict)


if __name__ == "__main__":
    main()
