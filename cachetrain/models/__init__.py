"""Models: loading and building pipelines, the formats of model files, drawing from a pipeline.

Owns: loading a pipeline or its parts from a hub id, folder or single file (``loading``); the code a
hub-style folder carries (``pipeline_code``); the SD1.5 + T5 pipeline and projection (``t5``); the flow
pipeline (``flow``); what kind of schedule a model has (``schedulers``); prompts -> conditioning
(``text_encoding``); assembling a T5 pipeline from parts (``assemble``); the original single-file layout
(``ldm_layout``) and export to it (``export``); drawing a sample and recording how (``sampling``,
``prompts``); adapters: the LoRA files' layouts (``lora_files``), LyCORIS' LoHa/LoKr files
(``lycoris_files``), which adapter a run's folder holds (``adapter_folders``), merge and extract
(``lora_tools``). Imports only the package root: every later stage (cache, train, sample, view) uses it.
"""
