"""The local dev chain: the real Rococo Asset Hub runtime, run offline by Chopsticks."""
