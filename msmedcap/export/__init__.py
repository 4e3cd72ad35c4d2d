"""Taking a trained model away: a transformers BLIP-2 directory (hf_blip2), a self-contained msmedcap
model directory (bundle), its model card (card) and the push to the Hugging Face Hub (hub); cli is
`msmedcap export`."""
