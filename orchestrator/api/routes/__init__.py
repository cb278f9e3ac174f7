"""The API's handlers, one module per resource; each module ends with `routes: list[Route]`.

orchestrator.api.app mounts those lists (in the order set there); handlers take the engine and
settings from `request.app.state` through orchestrator.api.common, which every module imports
and which imports none of them.
"""
