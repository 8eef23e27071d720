"""The OpenAI-compatible server (`pagedllm serve`): FastAPI app, protocol models, handlers."""
