"""Incentives: who contributed what, recorded so that anyone can check it.

`scoring` turns an update into credit; `ledger` records every received update in a hash-chained
SQLite ledger with a signed head per round (`ledger_format` defines the hashed and signed bytes,
`ledger_verify` checks a ledger file); `merkle` commits an aggregate to the set of updates it combines.
"""
