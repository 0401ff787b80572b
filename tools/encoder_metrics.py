"""Reconstruction of held-out phantoms by a zoo entry's encoder (one forward pass, no PTI), against the image of the
average code: the numbers the zoo manifest records for every encoder (the protocol of nbs/07_e4e.ipynb §8).

Usage: python tools/encoder_metrics.py spruce_nb/zoo/cxr64-opacity --modality cxr --classes normal opacity [--n 64]
Prints one JSON object (mse_e4e, mse_w_avg, lpips_alex_*, lpips_vgg_*, n_images, lpips_weights).
"""
import argparse, json
import torch
from spruce_nb.data import make_phantoms
from spruce_nb.stylegan2 import load_generator
from spruce_nb.e4e import load_encoder, invert, synthesize, reconstruction_metrics
from spruce_nb.perceptual import lpips_info

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('model_dir')
    p.add_argument('--modality', default='cxr')
    p.add_argument('--classes', nargs='+', required=True, help='classes of the held-out phantoms (label i %% len(classes))')
    p.add_argument('--n', type=int, default=64)
    a = p.parse_args(argv)
    torch.set_grad_enabled(False)
    G = load_generator(f'{a.model_dir}/generator.pt', device='cpu')
    E = load_encoder(f'{a.model_dir}/encoder.pt', G=G, device='cpu')      # refuses an encoder made for another generator
    x = make_phantoms(a.modality, a.n, size=G.img_resolution, split='test', classes=tuple(a.classes)).images
    rec = synthesize(G, invert(E, x))
    avg = synthesize(G, G.mapping.w_avg[None, None].repeat(len(x), G.num_ws, 1))
    out = dict(n_images=a.n, classes=a.classes)
    for net in ('alex', 'vgg'):                                          # MSE is the same for both: reported once
        m_e, m_a = reconstruction_metrics(rec, x, lpips_net=net), reconstruction_metrics(avg, x, lpips_net=net)
        out.update({f'lpips_{net}_e4e': round(m_e['lpips'], 4), f'lpips_{net}_w_avg': round(m_a['lpips'], 4),
                    f'lpips_{net}_trunk': lpips_info(net)['trunk']})
    out.update(mse_e4e=round(m_e['mse'], 5), mse_w_avg=round(m_a['mse'], 5))
    print(json.dumps(out, indent=1))

if __name__ == '__main__':
    main()
