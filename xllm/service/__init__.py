"""The OpenAI- and Anthropic-compatible HTTP server behind `xllm serve`; it talks to the engine only
through the `EngineClient` protocol (`AsyncLLM` in process).

- `protocol`, `anthropic_protocol`: pydantic request/response models of each API.
- `errors`, `anthropic_errors`: each API's error JSON and the FastAPI handlers (400, never 422).
- `engine_client`: the `EngineClient` protocol; requests -> `SamplingParams` and engine requests
  (one per prompt); merging their outputs, aborting, queue accounting.
- `deltas`: the engine's cumulative outputs as per-choice deltas, the one stream every endpoint renders.
- `serving`: completions and chat completions, whole or as server-sent events; the shared SSE framing.
- `anthropic_serving`: POST /v1/messages over the same engine, prompt path and deltas.
- `metrics`: the per-app Prometheus registry (`xllm:*`, named like vLLM's).
- `app`: the FastAPI app, background model loading, auth, draining state and access log.
- `server`: uvicorn with a SIGTERM drain that exits 0.
"""
