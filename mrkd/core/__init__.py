"""Contracts every layer shares: dataclass configs, the one image path (decode, resize, normalise), atomic
writes. Imports nothing else of mrkd."""
