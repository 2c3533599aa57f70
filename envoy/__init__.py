"""Envoy's configuration for genrpc (installed as `genrpc.envoy`): envoy.yaml.j2 (the bootstrap template),
error_shaper.lua (the Lua error shaper it includes), genrpc.pb (the descriptor set the transcoder reads) and
config.py (the renderer). rendered/ holds the rendering for the default settings (kept current by a test)."""
