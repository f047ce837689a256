"""The synthesis page: paint a semantic map in the browser, get samples from a stage-2 export.

    python recipes/app.py --gpt runs/demo/stage2/export        # then open the printed http://127.0.0.1:PORT/

Pieces, one job each:
    maps.py    the class palette, and exact validation of painted grids and uploaded label PNGs
    synth.py   Synthesizer: the loaded export; map + settings -> samples and the map as the model understood it
    jobs.py    JobQueue: one worker thread, requests in arrival order, each into its own Job (progress, outputs)
    server.py  the Starlette routes (JSON + server-sent progress events) and uvicorn on a bound socket
    static/    the page: index.html, app.css, app.js (a class-id grid drawn onto a canvas; no network assets)

Needs the `app` extra (`pip install .[app]`: starlette, uvicorn); nothing else is imported until it is used.
"""
