"""Checking a signed tool result (receipt) against a key ring (pure).

The tool's key is judged at ``received``: when the control received the result
(ingest), or, when the ledger is verified later, when the control accepted it (the
evidence event's time). Never at the result's own ``finished_at``, which whoever
holds a retired key could backdate.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import ValidationError

from toolplane.canonical import digest
from toolplane.errors import CanonicalJSONError, SignatureError, first_problem
from toolplane.messages import ResultMessage, signed_bytes
from toolplane.signing import KeyRing

__all__ = ["ReceiptProblem", "check_result_message", "check_unsigned_result"]


class ReceiptProblem(Exception):
    """Why a result message cannot be accepted; ``code`` is receipt_invalid or similar;
    ``kind`` names the problem in a word (``malformed``, ``signature``, ``result_hash``),
    what ingest counts it under."""

    def __init__(
        self, message: str, *, code: str = "receipt_invalid", kind: str = "invalid"
    ) -> None:
        super().__init__(message)
        self.code = code
        self.kind = kind
        self.message = message


def check_result_message(raw: Any, keys: KeyRing, *, received: datetime) -> ResultMessage:
    """Parse and verify a result message: signature by a key of the tool trusted at
    ``received``, and the result hash."""
    try:
        message = ResultMessage.model_validate(raw)
    except ValidationError as e:
        field, rule = first_problem(e, where="message")
        raise ReceiptProblem(f"malformed result message: {field}: {rule}", kind="malformed") from e
    result, receipt = message.result, message.receipt
    try:
        keys.verify(
            key_id=receipt.key_id,
            algorithm=receipt.algorithm,
            data=signed_bytes(result),
            signature=receipt.signature,
            owner=f"tool.{result.tool}",
            received=received,
        )
        result_digest = None if result.result is None else digest(result.result)
    except (SignatureError, CanonicalJSONError, ValueError, OverflowError) as e:
        raise ReceiptProblem(f"receipt signature: {e}", kind="signature") from e
    _check_result(message, result_digest)
    return message


def check_unsigned_result(raw: Any) -> ResultMessage:
    """Parse a result message and check its result hash, but not its receipt's signature:
    what a verifier without the key (an HMAC receipt's secret) can still check."""
    try:
        message = ResultMessage.model_validate(raw)
    except ValidationError as e:
        field, rule = first_problem(e, where="message")
        raise ReceiptProblem(f"malformed result message: {field}: {rule}", kind="malformed") from e
    result = message.result
    try:
        result_digest = None if result.result is None else digest(result.result)
    except (CanonicalJSONError, ValueError, OverflowError) as e:
        raise ReceiptProblem(f"result: {e}", kind="result_hash") from e
    _check_result(message, result_digest)
    return message


def _check_result(message: ResultMessage, result_digest: str | None) -> None:
    result = message.result
    if result.ok:
        if result.result is None or result.result_sha256 != result_digest:
            raise ReceiptProblem("result_sha256 does not match the result", kind="result_hash")
    elif result.error is None:
        raise ReceiptProblem("a failed result carries no error", kind="malformed")
