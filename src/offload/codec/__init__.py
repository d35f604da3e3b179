"""The one JSON form of what durable stores keep, and the rule for what they may name.

- `values`: the exact-JSON rule for arguments, the tagged form of a call's own fields,
  and one fast encoder;
- `trust`: which functions a stored task may name (the store's trust boundary);
- `strategies`: tenacity's built-in strategies as JSON, for a stored RetryPolicy;
- `task`: `TaskRecord`, every field a store keeps of a task, and the call's JSON text.

Nothing is imported here: `values` and `trust` sit below the calls and the records,
`task` above them.
"""
