"""Make the README demo pair (run once; documented in examples/data/brain/README.md)."""
import numpy as np, SimpleITK as sitk
S='/work/shared/data/'
OUT='/work/main/examples/data/brain/'
SP=1.5
def regrid(image, spacing):
    size=[int(round(n*s/spacing)) for n,s in zip(image.GetSize(), image.GetSpacing())]
    ref=sitk.Image(size, image.GetPixelID()); ref.SetSpacing([spacing]*3); ref.SetDirection(image.GetDirection())
    # same physical extent: first voxel centre moved by half the change of voxel size
    ref.SetOrigin(image.TransformContinuousIndexToPhysicalPoint([-0.5+0.5*spacing/s for s in image.GetSpacing()]))
    return ref
def resample(image, ref, nearest):
    return sitk.Resample(image, ref, sitk.Transform(), sitk.sitkNearestNeighbor if nearest else sitk.sitkLinear, 0)
mni=sitk.ReadImage(S+'antspy_legacy_data/mni.nii.gz'); mnia=sitk.ReadImage(S+'antspy_legacy_data/mnia.nii.gz')
colin=sitk.ReadImage(S+'antspy_legacy_data/ch2.nii.gz'); aal=sitk.ReadImage(S+'mricron_data_debian/aal.nii.gz')
r=regrid(mni,SP)
m=resample(mni,r,False); a=resample(mnia,r,True)
arr=sitk.GetArrayFromImage(m); m16=sitk.GetImageFromArray(np.clip(np.rint(arr),0,32767).astype(np.int16)); m16.CopyInformation(m)
sitk.WriteImage(m16, OUT+'mni152.nii.gz', True)
a8=sitk.Cast(a, sitk.sitkUInt8); sitk.WriteImage(a8, OUT+'mni152_aal.nii.gz', True)
r=regrid(colin,SP)
c=resample(colin,r,False); ca=resample(sitk.Cast(aal,sitk.sitkUInt8),r,True)
arr=sitk.GetArrayFromImage(c); scale=1000.0/np.percentile(arr[arr>0],99)
c16=sitk.GetImageFromArray(np.clip(np.rint(arr*scale),0,32767).astype(np.int16)); c16.CopyInformation(c)
# unalign: one rigid motion applied to the header (no resampling): 14 degrees about a tilted axis, 22 mm
axis=np.array([0.3,1.0,0.2]); axis/=np.linalg.norm(axis); ang=np.deg2rad(14.0)
k=np.array([[0,-axis[2],axis[1]],[axis[2],0,-axis[0]],[-axis[1],axis[0],0]]); R=np.eye(3)+np.sin(ang)*k+(1-np.cos(ang))*k@k
shift=np.array([12.0,-15.0,11.0])
for im,name in ((c16,'colin27.nii.gz'),(ca,'colin27_aal.nii.gz')):
    im.SetDirection((R@np.array(im.GetDirection()).reshape(3,3)).ravel().tolist())
    im.SetOrigin((R@np.array(im.GetOrigin())+shift).tolist())
    sitk.WriteImage(im, OUT+name, True)
for n in ('mni152','mni152_aal','colin27','colin27_aal'):
    im=sitk.ReadImage(OUT+n+'.nii.gz'); print(n, im.GetSize(), im.GetPixelIDTypeAsString(), np.round(im.GetOrigin(),1))
