"""`qmoe serve`: an OpenAI-compatible HTTP server for one loaded model.

    app.py        the HTTP side (Starlette on uvicorn): routes, streaming, errors, shutdown
    protocol.py   OpenAI request bodies -> checked GenerationRequests, and response objects
    scheduler.py  the model thread: slots with their own KV caches, a bounded queue,
                  batched decode steps, prompt-cache reuse
    text.py       tokens -> text, UTF-8 completed incrementally, stop strings cut exactly
    metrics.py    Prometheus text for /metrics

The model runs in one thread only (the scheduler's); the asyncio side only
checks requests, queues them and streams what the model thread sends back.
Needs the `serve` extra: pip install -e ".[serve]".
"""
