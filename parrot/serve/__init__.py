"""Serving: the Gradio chat demo (`python -m parrot.serve.demo`).

- `engine`: model + processor behind a session-free chat API (streamed replies, Parrot MoE routing weights).
- `uploads`: turning an uploaded file into a checked RGB image, with a clear message for bad uploads.
- `examples`: example images from the synthetic world with questions in the six MMMB languages.
- `app`: the Gradio Blocks UI; `demo`: the command line.
"""
