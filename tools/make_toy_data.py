"""Write the synthetic shapes dataset in COCO and/or ADE20K layout.

    python tools/make_toy_data.py data/toy                      # both layouts, defaults
    python tools/make_toy_data.py data/toy --kind coco --num-train 2000 --size 256

See :mod:`restv2_mm.toy_data` for what the images and annotations hold.
"""
import argparse
import os.path as osp
import sys
import time

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))

from restv2_mm.toy_data import KINDS, make_toy_data  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('out_dir', help='folder that receives coco/ and ade/')
    parser.add_argument('--kind', choices=KINDS, default='both')
    parser.add_argument('--num-train', type=int, default=200, help='training images')
    parser.add_argument('--num-val', type=int, default=50, help='validation images')
    parser.add_argument('--size', type=int, default=128, help='image side in pixels')
    parser.add_argument('--seed', type=int, default=0)
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    start = time.time()
    roots = make_toy_data(args.out_dir, kind=args.kind, num_train=args.num_train,
                          num_val=args.num_val, size=args.size, seed=args.seed)
    for kind, root in roots.items():
        print(f'{kind}: {root} ({args.num_train} train + {args.num_val} val images, '
              f'{args.size} x {args.size})')
    print(f'done in {time.time() - start:.1f} s')


if __name__ == '__main__':
    main()
