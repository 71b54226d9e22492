"""Data made and graded by models: the chat client (client.py), ROUGE-L (rouge.py), Self-Instruct
(selfinstruct.py), Ghost Attention (gatt.py).

Every stage here talks to models through :class:`llamalab.synth.client.ChatClient` (OpenAI-compatible
HTTP or a local llamalab model), with retries, a concurrency limit and a reply cache on disk.
"""

from llamalab.synth.client import ChatClient, ClientConfig, Reply

__all__ = ["ChatClient", "ClientConfig", "Reply"]
