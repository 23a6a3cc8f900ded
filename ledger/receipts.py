"""Checking a signed tool result (receipt) against a key ring (pure)."""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from toolplane.canonical import digest
from toolplane.errors import CanonicalJSONError, SignatureError, first_problem
from toolplane.messages import ResultMessage, ms_to_datetime, signed_bytes
from toolplane.signing import KeyRing

__all__ = ["ReceiptProblem", "check_result_message"]


class ReceiptProblem(Exception):
    """Why a result message cannot be accepted; ``code`` is receipt_invalid or similar."""

    def __init__(self, message: str, *, code: str = "receipt_invalid") -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def check_result_message(raw: Any, keys: KeyRing) -> ResultMessage:
    """Parse and verify a result message: signature by the tool's key, and result hash."""
    try:
        message = ResultMessage.model_validate(raw)
    except ValidationError as e:
        field, rule = first_problem(e, where="message")
        raise ReceiptProblem(f"malformed result message: {field}: {rule}") from e
    result, receipt = message.result, message.receipt
    try:
        keys.verify(
            key_id=receipt.key_id,
            algorithm=receipt.algorithm,
            data=signed_bytes(result),
            signature=receipt.signature,
            owner=f"tool.{result.tool}",
            at=ms_to_datetime(result.finished_at),
        )
        result_digest = None if result.result is None else digest(result.result)
    except (SignatureError, CanonicalJSONError, ValueError, OverflowError) as e:
        raise ReceiptProblem(f"receipt signature: {e}") from e
    if result.ok:
        if result.result is None or result.result_sha256 != result_digest:
            raise ReceiptProblem("result_sha256 does not match the result")
    elif result.error is None:
        raise ReceiptProblem("a failed result carries no error")
    return message
