"""The OpenAI-compatible HTTP server behind `xllm serve`; it talks to the engine only through `AsyncLLM`.

- `protocol`: pydantic request/response models (OpenAI's schemas plus vLLM's sampling extras).
- `errors`: OpenAI error JSON and the FastAPI handlers (400 for validation, never 422; generic 500).
- `engine_client`: requests -> `SamplingParams` and engine requests; merging, aborting, queue accounting.
- `serving`: completions and chat completions, whole or as server-sent events.
- `metrics`: the per-app Prometheus registry (`xllm:*`, named like vLLM's).
- `app`: the FastAPI app, background model loading, auth, draining state and access log.
- `server`: uvicorn with a SIGTERM drain that exits 0.
"""
