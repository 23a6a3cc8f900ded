#!/usr/bin/env bash
# A tool call submitted and followed to its end with curl alone: any language can do this.
# Needs TOOLPLANE_URL and TOOLPLANE_TOKEN; prints the events, then the finished run.
set -euo pipefail
: "${TOOLPLANE_URL:?set TOOLPLANE_URL}" "${TOOLPLANE_TOKEN:?set TOOLPLANE_TOKEN}"
auth="Authorization: Bearer ${TOOLPLANE_TOKEN}"

run=$(curl -sS --fail-with-body -X POST "${TOOLPLANE_URL}/v1/calls" \
  -H "${auth}" -H 'Content-Type: application/json' -H "Idempotency-Key: curl-$$-${RANDOM}" \
  -d '{"tool": "search_docs", "args": {"query": "signed receipts"}}')
run_id=$(printf '%s' "${run}" | sed -n 's/^{"run_id":"\([A-Za-z0-9_-]*\)".*/\1/p')
[ -n "${run_id}" ] || { echo "no run id in: ${run}" >&2; exit 1; }

# Server-Sent Events: the stream ends by itself after "event: end".
curl -sS -N --fail-with-body --max-time 60 -H "${auth}" -H 'Accept: text/event-stream' \
  "${TOOLPLANE_URL}/v1/runs/${run_id}/events"

curl -sS --fail-with-body -H "${auth}" "${TOOLPLANE_URL}/v1/runs/${run_id}"
echo
