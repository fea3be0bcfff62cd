// SPDX-License-Identifier: GPL-2.0
#include <linux/errno.h>
#include <linux/module.h>

#ifdef GLNV_P2P_GPL
#define GLNV_EXPORT EXPORT_SYMBOL_GPL
#else
#define GLNV_EXPORT EXPORT_SYMBOL
#endif

/* nvidia-fs asks for these six; none is ever called here (the guest has no GPU memory to map). */
#define GLNV_P2P(name) int name(void) { return -ENODEV; } GLNV_EXPORT(name);
GLNV_P2P(nvidia_p2p_dma_unmap_pages)
GLNV_P2P(nvidia_p2p_get_pages)
GLNV_P2P(nvidia_p2p_put_pages)
GLNV_P2P(nvidia_p2p_dma_map_pages)
GLNV_P2P(nvidia_p2p_free_dma_mapping)
GLNV_P2P(nvidia_p2p_free_page_table)

MODULE_LICENSE("GPL");
MODULE_DESCRIPTION("gl-nvidia test stand-in for nvidia.ko's nvidia_p2p_* exports");
