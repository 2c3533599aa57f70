"""The contract's generated stubs (scripts/gen_protos.py, from protos/genrpc/v1/).

A regular package, so a non-editable install ships it."""
