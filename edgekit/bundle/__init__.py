"""The bundle folder as a contract: the manifest schema (`manifest`), writing a folder atomically
and reading and checking one (`folder`), and onnxruntime-genai's config (`genai_config`).

May import: errors only. Never torch or transformers (checked): apps read bundles.
"""
