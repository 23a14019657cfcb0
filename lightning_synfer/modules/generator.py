"""SynFER generator: UNet2DConditionModel + DDPM training schedule + (sd) frozen VAE + text encoder + FAU adapter.

INTERFACE (sampling/synthesis code relies on exactly this; work in progress below this docstring):

    class GeneratorModule(L.LightningModule):            # task `generator`
        unet: UNet2DConditionModel; vae: Optional[AutoencoderKL]; text_encoder: TextEncoder
        au_adapter: Optional[AUAdapter]
        noise_scheduler: DDPMScheduler    # training schedule; samplers: DDIMScheduler.from_config(noise_scheduler.config)
        prediction_type: str              # "epsilon" | "v_prediction"
        label_names: list[str]; au_names: list[str]
        encode_text(captions: list[str]) -> Tensor (B, T, D_cross)      # after the text projection
        encode_aus(aus: Tensor (B, K) in [0,1]) -> Optional[Tensor (B, M, D_cross)]   # None without adapter
        conditioning(text_emb, au_tokens) -> Tensor    # encoder_hidden_states = cat([text (T), au (M)], dim=1)
        denoise(x_t, t, encoder_hidden_states, use_ema=False) -> Tensor  # the UNet's prediction (eps or v)
        images_to_model_space(images_m11) -> Tensor    # VAE encode * scaling (sd) or identity (tiny)
        model_space_to_images(z) -> Tensor             # VAE decode (sd) or identity; returns [-1, 1]
        sample_shape(batch) -> (B, C, H, W)            # shape of x_T
        ema_weights()                                  # context manager: EMA weights swapped in
        GeneratorModule.load(path)                     # export folder (save_pretrained) or Lightning .ckpt
    Unconditional inputs for guidance: caption "" and an all-zero AU vector (what dropout trains).
    set_au_scale(module.unet, s) from lightning_synfer.models.au_adapter changes the AU strength.
"""
