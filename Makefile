# The README's two commands: `make run` and `make test`. Both do all set-up on a fresh Debian machine.
.PHONY: run test setup services stop bench compose-check

run:
	scripts/stack.sh run

test:
	scripts/stack.sh test $(PYTEST_ARGS)

setup:
	scripts/stack.sh setup

services:
	scripts/stack.sh services

stop:
	scripts/stack.sh stop

bench:
	for b in webhook listener lifecycle timers isolation sse; do .venv/bin/python -m bench.$$b || exit 1; done

# The Docker path end to end (scripts/compose-check.sh): a few minutes, not part of `make test`.
compose-check:
	scripts/compose-check.sh
