"""``torchrun ... -m foe_train.train --config PATH [key=value ...]``"""

from foe_train.train.loop import main

main()
