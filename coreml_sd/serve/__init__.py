"""`coreml-sd serve`: a local web page and an AUTOMATIC1111-compatible HTTP API on a warm model.

One process keeps the model loaded (on a Mac, loading and compiling Core ML models is the slow
part) and runs one generation at a time from a FIFO queue. The modules:

  config.py     ServeConfig (frozen) and the exposure rule (--listen needs --api-key)
  catalog.py    the models a client may pick: the built-in one and those under --models-dir
  schemas.py    A1111's request and response shapes (pydantic)
  translate.py  an A1111 request -> a validated GenerationRequest (names, ranges, warnings)
  codec.py      base64 images in and out, PNG Info
  preview.py    latents -> a cheap RGB preview (A1111's "Approx cheap")
  runner.py     one request on a pipeline: interrupt and skip between steps, img2img detection
  worker.py     the single generation thread, its queue, live progress and model switching
  security.py   ASGI middleware: API key, Host/Origin checks, body size and rate limits
  app.py        the FastAPI application: /sdapi/v1/*, /coreml-sd/v1/*, the page at /
  server.py     uvicorn with a Ctrl-C that cancels the current image between steps

Nothing here is imported by `import coreml_sd`; FastAPI and uvicorn are the `serve` extra.
"""
