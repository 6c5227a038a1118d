"""The Ascend NPU backend: the HAL over torch_npu's fused operators, ACL graphs, ACL virtual
memory and HCCL. Importing this package imports neither torch_npu nor CANN; see `backend`."""
