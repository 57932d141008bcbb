"""`lepton serve` end to end: a real server process on loopback, real clients (the official openai
package, httpx, schemathesis), on a tiny random Llama checkpoint (CPU).

One server is shared by the whole directory (the session fixture ``server`` in conftest.py);
test_lifecycle.py and test_fuzz.py start their own, for what would disturb it (429 with a tiny
queue, SIGTERM/SIGINT, fuzzing).
"""
