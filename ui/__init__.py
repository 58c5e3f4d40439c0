"""The Factory's dashboard: a Gradio app that talks to the Factory only through its HTTP API.

factory ui --api http://127.0.0.1:8000       # on its own
factory up                                  # serves it at /ui beside the API
"""
