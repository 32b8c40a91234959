"""Tests that run the pack inside a real ComfyUI (its server, executor, core nodes, model management, progress and
interruption; no stand-ins). They run when COMFYUI_PATH names a ComfyUI source tree whose requirements are installed
in the Python running pytest, and skip otherwise:

    COMFYUI_PATH=/path/to/ComfyUI /path/to/comfy-venv/bin/python -m pytest tests/comfyui

To add a test: take the ``comfy`` fixture (a started server; see server.py) and call ``comfy.run(prompt)`` with an
API-format prompt (``prompts.workflow_prompt`` / ``prompts.api_prompt`` make one from a workflow); the returned
``Run`` has the websocket messages, /history outputs, preview count and the server log of that prompt.
"""
