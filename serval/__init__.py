"""The bundled Serval stack: sans-IO core, host daemon, socket library and tools."""
