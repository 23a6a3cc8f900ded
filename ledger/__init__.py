"""The evidence ledger: models, migrations, hash-chained appends and verification."""

from ledger.chain import EVIDENCE_KINDS, NewEvent, chain_for
from ledger.db import make_engine, make_sessionmaker
from ledger.errors import DatabaseUnavailable, LedgerError
from ledger.migrate import upgrade
from ledger.receipts import ReceiptProblem, check_result_message
from ledger.store import append_events
from ledger.verify import VerifyReport, verify_ledger

__all__ = [
    "EVIDENCE_KINDS",
    "DatabaseUnavailable",
    "LedgerError",
    "NewEvent",
    "ReceiptProblem",
    "VerifyReport",
    "append_events",
    "chain_for",
    "check_result_message",
    "make_engine",
    "make_sessionmaker",
    "upgrade",
    "verify_ledger",
]
