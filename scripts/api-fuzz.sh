#!/usr/bin/env bash
# Fuzzes the hub's HTTP API from its own OpenAPI document with schemathesis (from PyPI): a demo
# hub with its fleet runs, schemathesis sends generated and mutated requests to every operation,
# once with an admin token and once with a customer's (minted by the demo's identity provider),
# and fails on any server error or any response its schema does not allow.
#   scripts/api-fuzz.sh                 # 100 examples per operation
#   API_FUZZ_EXAMPLES=1000 scripts/api-fuzz.sh
# The schemathesis virtualenv is kept in target/schemathesis-venv.
set -euo pipefail
cd "$(dirname "$0")/.."

venv=target/schemathesis-venv
if [ ! -x "$venv/bin/schemathesis" ]; then
    python3 -m venv "$venv"
    "$venv/bin/pip" install -q 'schemathesis>=4.3,<5'
fi

cargo build -q -p larder-demo
out=$(mktemp)
target/debug/larder-demo --seconds 0 --seed 5 >"$out" 2>/dev/null &
hub=$!
trap 'kill $hub 2>/dev/null || true; wait $hub 2>/dev/null || true; rm -f "$out"' EXIT
for _ in $(seq 1 120); do
    grep -q '^  admin token' "$out" && break
    kill -0 $hub || { echo "the demo hub exited"; exit 1; }
    sleep 0.5
done
url=$(awk '$1 == "hub" {print $2; exit}' "$out")
token=$(awk '$1 == "admin" && $2 == "token" {print $3; exit}' "$out")
customer=$(awk '$1 == "customer" && $2 == "token" {print $3; exit}' "$out")
[ -n "$url" ] && [ -n "$token" ] && [ -n "$customer" ] || { echo "no hub address or tokens in the demo's output"; cat "$out"; exit 1; }

# The event feed is an endless stream (its own tests cover it); every other operation is fuzzed.
fuzz() {
    "$venv/bin/schemathesis" --config-file scripts/schemathesis.toml run "$url/openapi.json" \
        --url "$url" \
        --header "Authorization: Bearer $1" \
        --checks not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance \
        --exclude-path '/v1/regions/{r}/events' \
        --max-examples "$2" \
        --workers 1 \
        --request-timeout 10 \
        --seed 1
}
examples=${API_FUZZ_EXAMPLES:-100}
echo "fuzzing $url with an admin token"
fuzz "$token" "$examples"
echo "fuzzing $url with a customer's token"
fuzz "$customer" "$(( (examples + 1) / 2 ))"
