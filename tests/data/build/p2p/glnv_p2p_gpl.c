// SPDX-License-Identifier: GPL-2.0
#define GLNV_P2P_GPL
#include "glnv_p2p.c"
