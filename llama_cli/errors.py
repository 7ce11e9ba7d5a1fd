"""The two kinds of failure the command line tells apart.

`UserError` is something the user can fix (a flag, a path, a file): exit code 2.
`RuntimeFailure` is something that went wrong while running (out of memory, a peer
process died): exit code 1. Both carry a one-line message that says what is wrong
and what to do; the CLI prints it without a traceback unless `--debug` is given.
"""


class LlamaCliError(Exception):
    exit_code = 1


class UserError(LlamaCliError, ValueError):
    exit_code = 2
    # under torchrun every rank meets the same usage error and rank 0 alone says it; an error about this process's
    # own launch (its RANK, its missing MASTER_ADDR) may be met by one process alone, which then says it
    every_rank = False


class RuntimeFailure(LlamaCliError, RuntimeError):
    exit_code = 1
