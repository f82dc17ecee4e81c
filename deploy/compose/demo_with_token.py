"""Runs a tscale example with a bearer token, for the compose stack (its server has --auth-token-file).

    python3 demo_with_token.py EXAMPLE.py [the example's arguments]

The token is read from the file that $TSCALE_AUTH_TOKEN_FILE names (whole file, surrounding
whitespace removed, as the `tscale` CLI reads --auth-token-file). Every tscale.Client the example
creates without a token= gets this one; the example itself is run unchanged as __main__.
"""

import os
import runpy
import sys

import tscale


def main():
    if len(sys.argv) < 2:
        sys.exit("usage: demo_with_token.py EXAMPLE.py [arguments]")
    path = os.environ.get("TSCALE_AUTH_TOKEN_FILE", "")
    if not path:
        sys.exit("demo_with_token.py: TSCALE_AUTH_TOKEN_FILE: expected the path of a token file, got ''")
    with open(path) as f:
        token = f.read().strip()
    if not token:
        sys.exit(f"demo_with_token.py: {path}: expected a token, got an empty file")

    base = tscale.Client

    class Client(base):
        def __init__(self, *args, **kwargs):
            kwargs.setdefault("token", token)
            super().__init__(*args, **kwargs)

    tscale.Client = Client
    example = sys.argv[1]
    sys.argv = sys.argv[1:]
    runpy.run_path(example, run_name="__main__")


if __name__ == "__main__":
    main()
