#!/usr/bin/env bash
# The whole test suite: system packages, build, format, lints, cargo tests (with SoftHSM and swtpm
# required: a missing one fails instead of skipping), the fuzz smoke run, then real consumers
# (pkcs11-tool, the OpenSSL engine, ssh, TLS, NSS, Chromium, GnuTLS, Java, p11-kit) against the
# built module on every key store (scripts/e2e/run.sh).
#
#   scripts/test.sh
#
# Every stage runs even when an earlier one failed. Each stage counts once in the last line,
# `N passed, N failed` (scripts/e2e/run.sh prints its own per check). The exit status is non-zero
# when anything failed.
set -uo pipefail

# shellcheck source=scripts/lib/stages.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib/stages.sh"

stage setup bash scripts/setup.sh
stage cargo-fmt cargo fmt --all -- --check
stage cargo-build-release cargo build --release
stage cargo-clippy cargo clippy --all-targets -- -D warnings
stage macos-typecheck bash scripts/macos-typecheck.sh # the Secure Enclave store and the rest, checked and linted for aarch64/x86_64-apple-darwin
# `cargo test` builds no cdylib: the integration tests load target/debug/libdevicekey_pkcs11.so.
stage cargo-build-debug cargo build
stage cargo-test env DEVICEKEY_TEST_REQUIRE=softhsm,swtpm cargo test --no-fail-fast
stage fuzz-smoke bash scripts/fuzz.sh --smoke # fuzz harnesses on stable, 5 s per target; stress/crash/server tests run in cargo-test at STRESS_SCALE=0.1

stage e2e bash scripts/e2e/run.sh # real tools (pkcs11-tool, the OpenSSL engine, ssh, TLS, NSS, Chromium, GnuTLS, Java, p11-kit) on the software, SoftHSM-backed and TPM (swtpm) key stores

stages_finish test.sh
