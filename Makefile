# `make test`: set up what the tests need, then run every test. CI runs this (.ci/run).
.PHONY: test setup lint

setup:
	bash scripts/setup.sh

test: setup
	# The runner library is what `griffinc build` links executables with; tests build executables.
	cargo build --workspace --locked
	cargo test --workspace --locked

lint:
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets --locked -- -D warnings
