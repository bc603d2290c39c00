"""Names of the economy gossip topics (importable without py-libp2p)."""

QUOTES_TOPIC = "dllm/quotes/1"
"""Signed price announcements: providers' asks and clients' bids."""

VERDICTS_TOPIC = "dllm/verdicts/1"
"""Signed spot-check verdicts."""

TOPICS = (QUOTES_TOPIC, VERDICTS_TOPIC)
