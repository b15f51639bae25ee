# `make demo`: set up, build griffinc, compile the embedded demo model into an executable and
# run it. `make test`: set up what the tests need, then run every test. CI runs `make test`
# (.ci/run).
.PHONY: demo test setup lint

setup:
	bash scripts/setup.sh

demo: setup
	# --workspace also builds the runner library that executables are linked with.
	cargo build --release --workspace --locked
	target/release/griffinc demo --out-dir target/demo

test: setup
	# The runner library is what `griffinc build` links executables with; tests build executables.
	cargo build --workspace --locked
	cargo test --workspace --locked

lint:
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets --locked -- -D warnings
