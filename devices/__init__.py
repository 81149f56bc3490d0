"""edgespec.devices: facts about the machine the runtime runs on (threads, memory)."""
